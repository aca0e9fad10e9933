"""Errors a user can fix. The CLI prints them as one line and exits non-zero."""


class BatchJobsError(Exception):
    """A problem with configuration, input or the database that the user can act on."""


class SchemaOutOfDate(BatchJobsError):
    """batchjobs' own tables are missing or at another revision than this code expects."""
