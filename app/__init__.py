"""The FastAPI front end: routes, schemas, upload checks and the one error table. No torch."""
