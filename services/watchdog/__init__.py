"""The watchdog: probes every program's grpc.health.v1 and has supervisord
restart the one that keeps failing."""
