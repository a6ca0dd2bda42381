"""Speech recognition on faster-whisper: whole clips and live streams."""
