"""The operators' machinery: backups and restores, copying an old tasks.db, database statistics.

Only the operations commands use it; the agent imports `db` and `context_storage`, never this.
"""
