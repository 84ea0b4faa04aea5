"""The app tests: lifespan, health, `serve` as a process."""
