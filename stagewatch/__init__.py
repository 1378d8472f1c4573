"""stagewatch: a crash-safe deploy agent for one binary and its SQLite database.

The flow, one module a stage: checksum and verify -> snapshot -> swap -> service (restart)
-> health -> rollback when unhealthy; `engine` drives them from a journal so that a deploy
killed at any instant is finished or undone at the next start.
"""

__version__ = "0.1.0"
