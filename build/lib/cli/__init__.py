"""Coding agent task store: start-up (database initialisation) and operations commands.

Without a command: load config.yaml and the environment, initialise the database, bring the schema up to
date (development) or insist that it is (APP_ENV=production), and print a short status.

Run as `python -m cli` or `python main.py`."""
