"""The welcome-email app that `batchjobs demo` runs."""
