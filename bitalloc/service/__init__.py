"""`bitalloc serve`: profiles and plans over HTTP, with jobs, profiles and plans kept in a store.

store.py   the Store interface and its embedded SQLite implementation (+ files for tables)
sources.py model/calibration sources from requests: validation and content keys
work.py    what a job computes (a profile, a plan) and planning from a stored profile
jobs.py    worker processes that claim jobs, heartbeat, and re-queue jobs whose worker died
limits.py  what one request may cost: solver settings under server maxima, the job timeout
schemas.py pydantic request/response models (the OpenAPI document)
app.py     FastAPI routes, auth, limits, JSON errors; serve() runs it under uvicorn
"""
