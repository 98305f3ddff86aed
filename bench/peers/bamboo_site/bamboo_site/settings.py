"""Django settings for running bamboo-pipeline in the benchmark, configured by two environment variables.

- `BAMBOO_BENCH_DATABASE_URL`: `sqlite:////abs/path.db` or `postgresql://user@host:port/name`;
- `BAMBOO_BENCH_BROKER_URL`: the Celery broker (default: the local Redis, db 6).

Everything else is what bamboo-pipeline needs and nothing more: no web views, no admin.
"""

import os
from urllib.parse import unquote, urlsplit

from pipeline.eri.celery.queues import CELERY_QUEUES


def _database_from_url(url: str) -> dict:
    parts = urlsplit(url)
    if parts.scheme == "sqlite":
        # sqlite:////abs/path.db: the path is what follows "sqlite://".
        return {
            "ENGINE": "django.db.backends.sqlite3",
            "NAME": url.removeprefix("sqlite://"),
            # Several worker processes write at once: wait for the lock rather than fail at once.
            "OPTIONS": {"timeout": 60},
        }
    if parts.scheme in ("postgresql", "postgres"):
        return {
            "ENGINE": "django.db.backends.postgresql",
            "NAME": parts.path.lstrip("/"),
            "USER": unquote(parts.username or "postgres"),
            "PASSWORD": unquote(parts.password or ""),
            "HOST": parts.hostname or "127.0.0.1",
            "PORT": str(parts.port or 5432),
            # Kept open between tasks, as a tuned deployment would: a connection per task costs ms.
            "CONN_MAX_AGE": None,
        }
    raise ValueError(f"unsupported BAMBOO_BENCH_DATABASE_URL {url!r}")


SECRET_KEY = "benchmark-only-not-a-secret"
DEBUG = False
ALLOWED_HOSTS: list[str] = []
USE_TZ = True
TIME_ZONE = "UTC"
DEFAULT_AUTO_FIELD = "django.db.models.AutoField"

INSTALLED_APPS = [
    "django.contrib.contenttypes",
    "django.contrib.auth",
    "django_celery_beat",
    "pipeline",
    "pipeline.engine",
    "pipeline.component_framework",
    "pipeline.eri",
    "noop_plugins",
]

DATABASES = {"default": _database_from_url(os.environ.get("BAMBOO_BENCH_DATABASE_URL", "sqlite:////tmp/bamboo.db"))}

# bamboo-pipeline reads BROKER_URL itself (to declare queues); Celery reads the CELERY_* names.
BROKER_URL = os.environ.get("BAMBOO_BENCH_BROKER_URL", "redis://127.0.0.1:6379/6")
CELERY_BROKER_URL = BROKER_URL
CELERY_TASK_QUEUES = CELERY_QUEUES
CELERY_TASK_IGNORE_RESULT = True
CELERY_WORKER_HIJACK_ROOT_LOGGER = False

# Component models in the database are only for bamboo's UI; updating them from every process at
# import time would only add lock contention.
AUTO_UPDATE_COMPONENT_MODELS = False
AUTO_UPDATE_VARIABLE_MODELS = False
ENABLE_EXAMPLE_COMPONENTS = False

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "root": {"handlers": ["console"], "level": os.environ.get("BAMBOO_BENCH_LOG_LEVEL", "WARNING")},
}
