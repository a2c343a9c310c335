"""The fleet console: server-rendered pages for operators and admins (docs/console.md)."""
