"""What every talker process shares: bootstrap, health, reflection, trace ids,
metrics, JSON logs, settings, error mapping and audio decoding."""
