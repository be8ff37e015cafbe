"""Settings: sqlite in $BFF_DJANGO_DIR, SimpleJWT with short-lived access tokens,
rotating refresh tokens and blacklisting after rotation."""

from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path

DATA_DIR = Path(os.environ["BFF_DJANGO_DIR"])
ACCESS_SECONDS = float(os.environ.get("BFF_DJANGO_ACCESS_SECONDS", "3"))

SECRET_KEY = "test-only-not-a-secret-" + "x" * 40  # signs the JWTs (HS256)
DEBUG = False
ALLOWED_HOSTS = ["127.0.0.1", "localhost"]
USE_TZ = True
ROOT_URLCONF = "tests.django_app.urls"
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

INSTALLED_APPS = [
    "django.contrib.contenttypes",
    "django.contrib.auth",
    "rest_framework",
    "rest_framework_simplejwt",
    "rest_framework_simplejwt.token_blacklist",
]

# No session or CSRF middleware: the API authenticates with JWTs only.
MIDDLEWARE = ["tests.django_app.middleware.RecordTokens"]

DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.sqlite3",
        "NAME": str(DATA_DIR / "db.sqlite3"),
        # Concurrent requests read while a refresh writes: wait, do not fail.
        "OPTIONS": {"timeout": 30},
    }
}

# A fast hasher: the test logs in once, hashing strength is not what it checks.
PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]

REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "rest_framework_simplejwt.authentication.JWTAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated"],
    "DEFAULT_RENDERER_CLASSES": ["rest_framework.renderers.JSONRenderer"],
    "UNAUTHENTICATED_USER": None,
}

SIMPLE_JWT = {
    "ACCESS_TOKEN_LIFETIME": timedelta(seconds=ACCESS_SECONDS),
    "REFRESH_TOKEN_LIFETIME": timedelta(hours=1),
    "ROTATE_REFRESH_TOKENS": True,
    "BLACKLIST_AFTER_ROTATION": True,
    "UPDATE_LAST_LOGIN": False,
    "LEEWAY": 0,
}

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"null": {"class": "logging.NullHandler"}},
    "root": {"handlers": ["null"], "level": "ERROR"},
}
