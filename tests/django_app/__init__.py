"""A minimal Django REST framework + SimpleJWT project: a real upstream for tests.

Started by tests/integration/test_django_simplejwt.py as a subprocess with
``python -m tests.django_app.serve PORT``. Everything it writes (the sqlite
database and the event log) lives in the directory named by ``BFF_DJANGO_DIR``.
"""
