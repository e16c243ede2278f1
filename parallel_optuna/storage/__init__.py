"""The study's storage: the journal file, its snapshot, its readers' lock, and the adapter to Optuna's internals."""
