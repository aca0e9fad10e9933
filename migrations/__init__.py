"""batchjobs' own alembic migrations, installed as ``batchjobs.migrations``."""
