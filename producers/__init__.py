"""Market-data producers: live websocket feeds (cryptofeed and our own adapters) and replays of
recorded data (IAQF bars, Binance frames, CSV), published to the per-exchange Kafka topics."""
