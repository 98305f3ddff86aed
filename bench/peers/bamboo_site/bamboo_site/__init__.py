"""The smallest Django project that runs bamboo-pipeline: settings, its Celery app, one noop component."""

# bamboo-pipeline sends its tasks through Celery's `current_app`, so the app must exist as soon as
# Django's settings are loaded, in the benchmark's client process as in the workers.
from bamboo_site.celery_app import app

__all__ = ["app"]
