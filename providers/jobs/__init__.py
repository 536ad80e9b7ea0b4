"""Jobs shared by both providers: run directories, the SQLite job store, the queue and process supervision
(launchers: providers/launchers)."""
