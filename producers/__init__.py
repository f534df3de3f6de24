"""Market-data producers: replay of recorded data (and, later, live websocket feeds)."""
