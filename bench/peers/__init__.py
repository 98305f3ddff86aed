"""The peers the engine is compared with (Celery, bamboo-engine), run from their own venv `.venv-peers`.

Nothing here may import the project's dependencies: these modules run under `.venv-peers/bin/python`,
which has only bench/peers/requirements.txt installed (and the standard library).
"""
