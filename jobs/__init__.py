"""Durable render jobs: a Redis Streams queue (queue.py), the worker program
that speaks and renders them (worker.py), and the Redis server program
(redis_server.py) that supervisord runs beside the services."""
