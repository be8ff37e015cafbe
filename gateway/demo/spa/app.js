// bff-gateway demo SPA. Plain JavaScript, no build step, no external resources.
//
// It talks only to its own origin (the gateway):
//   POST /auth/demo/login, GET /auth/demo/session, POST /auth/demo/logout
//   GET  /api/demo/user, /api/demo/items, /api/demo/events (SSE), /api/demo/download
//   WebSocket /api/demo/ws (echo and ticks)
// or, signed in with OpenID Connect (provider "oidc"): the link to
//   GET /auth/oidc/login?return_to=/ (the gateway sends the browser to the provider
//   and back), the same calls under /auth/oidc and /api/oidc, and the navigation to
//   GET /auth/oidc/logout?return_to=/ (ends the provider's session too).
// It never sees a token: the session lives in a sealed HttpOnly cookie that the
// browser sends by itself. Everything inserted into the page goes through
// textContent, never innerHTML.
"use strict";

(() => {
  const PROVIDERS = ["demo", "oidc"]; // password login, OpenID Connect
  let provider = "demo";
  let AUTH = `/auth/${provider}`;
  let API = `/api/${provider}`;

  function useProvider(name) {
    provider = name;
    AUTH = `/auth/${name}`;
    API = `/api/${name}`;
  }
  const AUTO_CALL_MS = 5000;
  const POLL_MS = 1000;
  const SSE_COUNT = 30;
  const DOWNLOAD_BYTES = 20 * 1024 * 1024;
  const MAX_LOG_LINES = 100;
  const WS_TICK_SECONDS = 5;

  const $ = (id) => document.getElementById(id);

  const state = {
    signedIn: false,
    expiresAt: null, // access token expiry (unix seconds) as last reported by the gateway
    sessionExpiresAt: null,
    calls: 0,
    failures: 0,
    refreshes: 0,
    autoTimer: null,
    pollTimer: null,
    polling: false,
    eventSource: null,
    socket: null,
    downloading: false,
  };

  // ------------------------------------------------------------------ helpers

  class ApiError extends Error {
    constructor(status, code, message) {
      super(message);
      this.status = status;
      this.code = code;
    }
  }

  /** fetch() against the gateway; resolves to parsed JSON (or null), rejects with ApiError. */
  async function request(method, path, body) {
    const headers = { Accept: "application/json" };
    if (method !== "GET" && method !== "HEAD") headers["X-CSRF"] = "1";
    const init = { method, headers, credentials: "same-origin", cache: "no-store" };
    if (body !== undefined) {
      headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(body);
    }
    let response;
    try {
      response = await fetch(path, init);
    } catch (_err) {
      throw new ApiError(0, "network_error", "The gateway could not be reached.");
    }
    if (response.status === 204) return null;
    const data = await readJson(response);
    if (!response.ok) throw errorFrom(response, data);
    return data;
  }

  async function readJson(response) {
    const type = response.headers.get("Content-Type") || "";
    if (!type.includes("json")) return null;
    try {
      return await response.json();
    } catch (_err) {
      return null;
    }
  }

  function errorFrom(response, data) {
    const code = data && typeof data.error === "string" ? data.error : `http_${response.status}`;
    const message =
      data && typeof data.message === "string"
        ? data.message
        : `${response.status} ${response.statusText || "error"}`.trim();
    return new ApiError(response.status, code, message);
  }

  function describe(err) {
    if (err instanceof ApiError) return `${err.message} (${err.code})`;
    return String(err && err.message ? err.message : err);
  }

  function setStatus(text) {
    $("status").textContent = text || "";
  }

  function clock(unixSeconds) {
    const date = unixSeconds === undefined ? new Date() : new Date(unixSeconds * 1000);
    return date.toLocaleTimeString([], { hour12: false });
  }

  function el(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined && text !== null) node.textContent = String(text);
    return node;
  }

  function prependLimited(list, item) {
    list.prepend(item);
    while (list.children.length > MAX_LOG_LINES) list.lastElementChild.remove();
  }

  function isSessionGone(err) {
    return (
      err instanceof ApiError &&
      err.status === 401 &&
      (err.code === "login_required" || err.code === "session_expired")
    );
  }

  // ------------------------------------------------------------------ views

  function showLogin() {
    state.signedIn = false;
    $("app-view").hidden = true;
    $("login-view").hidden = false;
    $("logout-button").hidden = true;
    const pill = $("auth-state");
    pill.textContent = "Signed out";
    pill.className = "pill pill-muted";
    const username = $("username");
    if (!username.value) username.focus();
  }

  function showApp() {
    state.signedIn = true;
    $("login-view").hidden = true;
    $("app-view").hidden = false;
    $("logout-button").hidden = false;
    const pill = $("auth-state");
    pill.textContent = "Signed in";
    pill.className = "pill pill-ok";
  }

  function renderUser(user) {
    if (!user) return;
    const name = user.name || user.preferred_username || user.username || user.sub || "";
    $("user-name").textContent = name;
    $("user-username").textContent = user.username || user.preferred_username || "–";
    $("user-email").textContent = user.email || "–";
    const roles = Array.isArray(user.roles) ? user.roles.join(", ") : "";
    $("user-roles").textContent = roles || "–";
  }

  function renderItems(items) {
    const list = $("items");
    list.replaceChildren();
    if (!Array.isArray(items) || items.length === 0) {
      list.append(el("li", "empty", "No projects."));
      return;
    }
    for (const item of items) {
      const li = el("li", "item");
      li.dataset.id = String(item.id);
      li.append(el("span", "item-id", `#${item.id}`));
      const name = el("span", "item-name", item.name);
      if (item.description) name.append(el("span", "item-desc", item.description));
      li.append(name);
      const status = String(item.status || "unknown");
      const slug = status.toLowerCase().replace(/[^a-z0-9]+/g, "-");
      li.append(el("span", `badge badge-${slug}`, status));
      list.append(li);
    }
  }

  function renderCounters() {
    $("call-count").textContent = String(state.calls);
    $("fail-count").textContent = String(state.failures);
  }

  function renderCountdown() {
    const target = $("session-expires");
    if (state.expiresAt === null || state.expiresAt === undefined) {
      target.textContent = "unknown";
      target.classList.remove("expired");
      delete target.dataset.expiresAt;
      return;
    }
    target.dataset.expiresAt = String(state.expiresAt);
    const remaining = state.expiresAt - Date.now() / 1000;
    if (remaining > 0) {
      target.textContent = `${Math.floor(remaining)}s`;
      target.classList.remove("expired");
    } else {
      target.textContent = "expired — renewed on the next API call";
      target.classList.add("expired");
    }
  }

  function renderBrowserStorage() {
    const dump = (storage) => {
      const out = {};
      try {
        for (let i = 0; i < storage.length; i += 1) {
          const key = storage.key(i);
          out[key] = storage.getItem(key);
        }
      } catch (_err) {
        return "(not accessible)";
      }
      const count = Object.keys(out).length;
      return `${JSON.stringify(out, null, 2)}   (${count} key${count === 1 ? "" : "s"})`;
    };
    const cookie = document.cookie;
    const lines = [
      `document.cookie = ${JSON.stringify(cookie)}` +
        (cookie ? "" : "   (empty: the session cookie is HttpOnly)"),
      `localStorage    = ${dump(window.localStorage)}`,
      `sessionStorage  = ${dump(window.sessionStorage)}`,
    ];
    $("browser-storage").textContent = lines.join("\n");
  }

  function resetRefreshLog() {
    state.refreshes = 0;
    const log = $("refresh-log");
    log.replaceChildren(el("li", "empty", "None yet."));
  }

  function logRefresh(previous, next) {
    state.refreshes += 1;
    const log = $("refresh-log");
    const empty = log.querySelector(".empty");
    if (empty) empty.remove();
    const li = el("li", "refresh");
    li.append(el("time", null, clock()), document.createTextNode(" "));
    const gained = Math.round(next - previous);
    li.append(
      document.createTextNode(
        `Token refreshed by the gateway — expires ${clock(next)} (+${gained} s)`,
      ),
    );
    prependLimited(log, li);
  }

  // ------------------------------------------------------------------ session

  function applySession(session) {
    const next = typeof session.expires_at === "number" ? session.expires_at : null;
    const previous = state.expiresAt;
    if (previous !== null && next !== null && next > previous) logRefresh(previous, next);
    state.expiresAt = next;
    state.sessionExpiresAt =
      typeof session.session_expires_at === "number" ? session.session_expires_at : null;
    if (state.sessionExpiresAt !== null) {
      $("session-detail").dataset.sessionExpiresAt = String(state.sessionExpiresAt);
    }
    renderCountdown();
  }

  async function pollSession() {
    if (state.polling) return;
    state.polling = true;
    try {
      const session = await request("GET", `${AUTH}/session`);
      if (!state.signedIn) return;
      if (!session || session.authenticated !== true) {
        leaveApp("Your session has ended. Please sign in again.");
        return;
      }
      applySession(session);
    } catch (err) {
      if (state.signedIn) setStatus(`Session check failed: ${describe(err)}`);
    } finally {
      state.polling = false;
      if (state.signedIn) {
        renderCountdown();
        renderBrowserStorage();
      }
    }
  }

  // ------------------------------------------------------------------ API calls

  async function loadUser() {
    try {
      renderUser(await request("GET", `${API}/user`));
    } catch (err) {
      handleApiError(err);
    }
  }

  async function callApi() {
    try {
      const items = await request("GET", `${API}/items`);
      state.calls += 1;
      renderItems(items);
      $("last-call").textContent = clock();
      setStatus("");
    } catch (err) {
      state.failures += 1;
      $("last-call").textContent = clock();
      handleApiError(err);
    } finally {
      renderCounters();
    }
  }

  function handleApiError(err) {
    if (isSessionGone(err)) {
      leaveApp(`Signed out: ${describe(err)}`);
      return;
    }
    setStatus(describe(err));
  }

  function setAutoCall(on) {
    if (state.autoTimer !== null) {
      clearInterval(state.autoTimer);
      state.autoTimer = null;
    }
    $("auto-call").checked = on;
    if (on) {
      state.autoTimer = setInterval(callApi, AUTO_CALL_MS);
      callApi();
    }
  }

  // ------------------------------------------------------------------ SSE

  function sseNote(text) {
    prependLimited($("sse-log"), el("li", "note", `${clock()}  ${text}`));
  }

  function startSse() {
    stopSse();
    const source = new EventSource(`${API}/events?count=${SSE_COUNT}`);
    state.eventSource = source;
    $("sse-toggle").textContent = "Stop";
    sseNote("connecting…");
    source.onopen = () => sseNote("connected");
    source.onmessage = (event) => {
      let data;
      try {
        data = JSON.parse(event.data);
      } catch (_err) {
        return;
      }
      const when = typeof data.time === "number" ? clock(data.time) : clock();
      prependLimited($("sse-log"), el("li", "event", `${when}  event #${data.n}`));
      if (typeof data.count === "number" && data.n >= data.count) {
        stopSse(`stream complete (${data.count} events)`);
      }
    };
    source.onerror = () => {
      if (source !== state.eventSource) return;
      if (source.readyState === EventSource.CLOSED) {
        stopSse("stream closed by the server");
      } else {
        sseNote("connection lost — reconnecting…");
      }
    };
  }

  function stopSse(note) {
    if (state.eventSource !== null) {
      state.eventSource.close();
      state.eventSource = null;
      if (note) sseNote(note);
    }
    $("sse-toggle").textContent = "Start";
  }

  // ------------------------------------------------------------------ WebSocket

  function wsNote(text, className) {
    prependLimited($("ws-log"), el("li", className || "note", `${clock()}  ${text}`));
  }

  function setWsOpen(open) {
    $("ws-toggle").textContent = open ? "Disconnect" : "Connect";
    $("ws-input").disabled = !open;
    $("ws-send").disabled = !open;
  }

  function startWs() {
    stopWs();
    const scheme = location.protocol === "https:" ? "wss" : "ws";
    // Same origin: the browser sends the session cookie and its Origin; the gateway
    // checks the Origin and adds the token to the handshake it makes upstream.
    const socket = new WebSocket(`${scheme}://${location.host}${API}/ws?tick=${WS_TICK_SECONDS}`);
    state.socket = socket;
    wsNote("connecting…");
    socket.onopen = () => {
      if (socket !== state.socket) return;
      setWsOpen(true);
      wsNote("connected");
    };
    socket.onmessage = (event) => {
      if (socket !== state.socket) return;
      let data = null;
      try {
        data = JSON.parse(event.data);
      } catch (_err) {
        data = null;
      }
      if (data && typeof data.tick === "number") {
        const until = typeof data.token_expires_at === "number" ? clock(data.token_expires_at) : "?";
        wsNote(
          `tick #${data.tick}: the handshake carried a valid token for ${data.user} (expiring ${until})`,
          "event tick",
        );
      } else {
        wsNote(`echo: ${String(event.data).slice(0, 200)}`, "event echo");
      }
    };
    socket.onclose = (event) => {
      // Logged also for a socket the page closed itself: its code is worth seeing.
      if (socket === state.socket) {
        state.socket = null;
        setWsOpen(false);
      }
      const reason = event.reason ? ` (${event.reason})` : "";
      wsNote(`closed: ${event.code}${reason}`, "note closed");
    };
  }

  function stopWs(note) {
    if (state.socket !== null) {
      const socket = state.socket;
      state.socket = null;
      socket.close(1000, "closed by the page");
      if (note) wsNote(note);
    }
    setWsOpen(false);
  }

  function sendWs(event) {
    event.preventDefault();
    const input = $("ws-input");
    const text = input.value.trim();
    if (!text || state.socket === null || state.socket.readyState !== WebSocket.OPEN) return;
    state.socket.send(text);
    wsNote(`sent: ${text}`);
    input.value = "";
  }

  // ------------------------------------------------------------------ download

  async function download() {
    if (state.downloading) return;
    state.downloading = true;
    const button = $("download-button");
    const progress = $("download-progress");
    const result = $("download-result");
    button.disabled = true;
    progress.value = 0;
    result.textContent = "Downloading…";
    const started = performance.now();
    try {
      const response = await fetch(`${API}/download?size=${DOWNLOAD_BYTES}`, {
        credentials: "same-origin",
        cache: "no-store",
      });
      if (!response.ok) throw errorFrom(response, await readJson(response));
      const total = Number(response.headers.get("Content-Length")) || DOWNLOAD_BYTES;
      const reader = response.body.getReader();
      let received = 0;
      for (;;) {
        const { done, value } = await reader.read();
        if (done) break;
        received += value.byteLength;
        progress.value = received / total;
      }
      const seconds = Math.max((performance.now() - started) / 1000, 0.001);
      const mib = received / (1024 * 1024);
      result.textContent = `${mib.toFixed(1)} MiB in ${seconds.toFixed(2)} s (${(mib / seconds).toFixed(1)} MiB/s)`;
    } catch (err) {
      result.textContent = "Download failed.";
      handleApiError(err instanceof ApiError ? err : new ApiError(0, "network_error", String(err)));
    } finally {
      state.downloading = false;
      button.disabled = false;
    }
  }

  // ------------------------------------------------------------------ login / logout

  function enterApp(session, user) {
    stopAll();
    state.calls = 0;
    state.failures = 0;
    state.expiresAt = null;
    renderCounters();
    $("last-call").textContent = "–";
    $("sse-log").replaceChildren();
    $("ws-log").replaceChildren();
    resetRefreshLog();
    showApp();
    renderUser(user || (session && session.claims) || null);
    if (session) applySession(session);
    renderBrowserStorage();
    loadUser();
    callApi();
    startSse();
    startWs();
    state.pollTimer = setInterval(pollSession, POLL_MS);
  }

  function stopAll() {
    setAutoCall(false);
    stopSse();
    stopWs();
    if (state.pollTimer !== null) {
      clearInterval(state.pollTimer);
      state.pollTimer = null;
    }
  }

  function leaveApp(message) {
    stopAll();
    state.expiresAt = null;
    $("items").replaceChildren();
    $("user-name").textContent = "";
    $("password").value = "";
    showLogin();
    setStatus(message || "");
  }

  async function onLogin(event) {
    event.preventDefault();
    const username = $("username").value.trim();
    const password = $("password").value;
    if (!username || !password) {
      setStatus("Enter a username and a password (demo / demo).");
      return;
    }
    const button = $("login-button");
    button.disabled = true;
    button.textContent = "Signing in…";
    try {
      useProvider("demo");
      const answer = await request("POST", `${AUTH}/login`, { username, password });
      setStatus("");
      let session = null;
      try {
        session = await request("GET", `${AUTH}/session`);
      } catch (_err) {
        session = null;
      }
      enterApp(session && session.authenticated ? session : null, answer && answer.user);
    } catch (err) {
      setStatus(`Sign-in failed: ${describe(err)}`);
    } finally {
      button.disabled = false;
      button.textContent = "Sign in";
    }
  }

  async function onLogout() {
    if (provider === "oidc") {
      // A navigation: the gateway ends the session, revokes the refresh token and
      // sends the browser to the provider's end-session page, which comes back here.
      stopAll();
      window.location.assign(`${AUTH}/logout?return_to=/`);
      return;
    }
    const button = $("logout-button");
    button.disabled = true;
    try {
      await request("POST", `${AUTH}/logout`);
      leaveApp("");
    } catch (err) {
      setStatus(`Logout failed: ${describe(err)}`);
    } finally {
      button.disabled = false;
    }
  }

  // ------------------------------------------------------------------ start

  async function start() {
    $("login-form").addEventListener("submit", onLogin);
    $("logout-button").addEventListener("click", onLogout);
    $("call-api").addEventListener("click", callApi);
    $("auto-call").addEventListener("change", (event) => setAutoCall(event.target.checked));
    $("sse-toggle").addEventListener("click", () => {
      if (state.eventSource) stopSse("stopped");
      else startSse();
    });
    $("download-button").addEventListener("click", download);
    $("ws-toggle").addEventListener("click", () => {
      if (state.socket) stopWs("disconnected");
      else startWs();
    });
    $("ws-form").addEventListener("submit", sendWs);
    renderBrowserStorage();
    // A sign-in that failed comes back with ?bff_error=<code>: say so, then tidy the URL.
    const params = new URLSearchParams(window.location.search);
    const failed = params.get("bff_error");
    if (failed) window.history.replaceState(null, "", window.location.pathname);
    try {
      for (const name of PROVIDERS) {
        useProvider(name);
        const session = await request("GET", `${AUTH}/session`);
        if (session && session.authenticated === true) {
          enterApp(session, null);
          return;
        }
      }
      useProvider("demo");
      showLogin();
      if (failed) setStatus(`Sign-in failed: ${failed}`);
    } catch (err) {
      showLogin();
      setStatus(describe(err));
    }
  }

  if (document.readyState === "loading") {
    document.addEventListener("DOMContentLoaded", start);
  } else {
    start();
  }
})();
