"""``arbmarket``: the Kafka source of the market query, decoding records where it reads them.

The same reader as ``arbkafka`` (:class:`spark_jobs.kafka_source.KafkaStreamReader`: offsets,
rate and byte limits, data-loss handling, checkpointed positions), but each read batch of up
to 10k records is parsed, validated and keyed in the reader (:func:`spark_jobs.decode.
Decoder.records`) and leaves as a few packed rows (:data:`spark_jobs.decode.PACKED_DDL`), one per
bucket. The JVM then never converts, parses or shuffles individual records: that saves the
per-record Arrow → row → Arrow round trip and Spark's ``from_json`` between the Python source
and the stateful operator.

Options: those of ``arbkafka``, plus ``decode`` (required), a
:meth:`spark_jobs.decode.DecodeConfig.to_json` string.
"""

from __future__ import annotations

from collections.abc import Iterator

import pyarrow as pa
from pyspark.sql.types import StructType

from spark_jobs.decode import PACKED_DDL, DecodeConfig, Decoder, packed
from spark_jobs.kafka_source import KafkaDataSource, KafkaPartition, KafkaStreamReader

FORMAT = "arbmarket"


class MarketStreamReader(KafkaStreamReader):
    """:class:`KafkaStreamReader` whose ``read`` yields packed, decoded records."""

    def __init__(self, options: dict[str, str]) -> None:
        super().__init__(options)
        if "decode" not in options:
            raise ValueError("option decode (a DecodeConfig as JSON) is required")
        self.decode = DecodeConfig.from_json(options["decode"])

    def read(self, partition: KafkaPartition) -> Iterator[pa.RecordBatch]:  # type: ignore[override]
        """Executor side: each read batch of ``[start, end)`` → one packed row per bucket.

        Raises:
            spark_jobs.kafka_source.KafkaDataLossError: as the ``arbkafka`` reader.
        """
        decoder = Decoder(self.decode)
        for cols in self.read_columns(partition):
            yield packed(decoder.records(cols["value"], cols["topic"], cols["partition"],
                                         cols["offset"]))


class MarketDataSource(KafkaDataSource):
    """``arbmarket`` (stream reading only); see the module docstring."""

    @classmethod
    def name(cls) -> str:
        return FORMAT

    def schema(self) -> str:
        return PACKED_DDL

    def streamReader(self, schema: StructType) -> MarketStreamReader:
        return MarketStreamReader(self.options)
