"""The index: patients, studies, series and instances in SQL (SQLite or PostgreSQL)."""
