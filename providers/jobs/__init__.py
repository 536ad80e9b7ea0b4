"""Jobs shared by both providers: run directories, the SQLite job store, the queue, launchers and process supervision."""
