"""The Celery app bamboo-pipeline's workers and the benchmark client share (`celery -A bamboo_site`)."""

import os

from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "bamboo_site.settings")

app = Celery("bamboo_site")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks(["pipeline.eri.celery"])
