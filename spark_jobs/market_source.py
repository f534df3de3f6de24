"""``arbmarket``: the Kafka source of the market query, decoding records where it reads them.

The same reader as ``arbkafka`` (:class:`spark_jobs.kafka_source.KafkaStreamReader`: offsets,
rate and byte limits, data-loss handling, checkpointed positions), but each read batch of up
to 10k records is parsed, validated and keyed in the reader (:func:`spark_jobs.decode.
Decoder.records`) and leaves as a few packed rows (:data:`spark_jobs.decode.PACKED_DDL`), one per
bucket. The JVM then never converts, parses or shuffles individual records: that saves the
per-record Arrow → row → Arrow round trip and Spark's ``from_json`` between the Python source
and the stateful operator.

Every micro-batch that reads data also gets one small extra input partition
(:class:`PartitionList`) whose rows name every partition of the subscribed topics, for every
bucket (:func:`spark_jobs.decode.partition_list`): the engine then knows the partitions that
have not delivered a record yet and holds its watermark for them until they are idle, so the
first micro-batch of a replay, which often reads only the partitions already written, does
not make the others' first records late.

Options: those of ``arbkafka``, plus ``decode`` (required), a
:meth:`spark_jobs.decode.DecodeConfig.to_json` string.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import pyarrow as pa
from pyspark.sql.datasource import InputPartition
from pyspark.sql.types import StructType

from spark_jobs.decode import PACKED_DDL, DecodeConfig, Decoder, packed, partition_list
from spark_jobs.kafka_source import KafkaDataSource, KafkaPartition, KafkaStreamReader

FORMAT = "arbmarket"


@dataclass(frozen=True)
class PartitionList(InputPartition):
    """Every ``(topic, partition)`` of the micro-batch's end offsets (no Kafka read)."""

    keys: tuple[tuple[str, int], ...]


class MarketStreamReader(KafkaStreamReader):
    """:class:`KafkaStreamReader` whose ``read`` yields packed, decoded records."""

    def __init__(self, options: dict[str, str]) -> None:
        super().__init__(options)
        if "decode" not in options:
            raise ValueError("option decode (a DecodeConfig as JSON) is required")
        self.decode = DecodeConfig.from_json(options["decode"])

    def partitions(self, start: dict, end: dict) -> list[InputPartition]:  # type: ignore[override]
        """The ``arbkafka`` ranges, plus a :class:`PartitionList` when there is any."""
        ranges: list[InputPartition] = list(super().partitions(start, end))
        if not ranges:
            return ranges
        keys = tuple(sorted((t, int(p)) for t, parts in end.items() for p in parts))
        return [*ranges, PartitionList(keys)]

    def read(self, partition: KafkaPartition | PartitionList  # type: ignore[override]
             ) -> Iterator[pa.RecordBatch]:
        """Executor side: each read batch of ``[start, end)`` → one packed row per bucket;
        a :class:`PartitionList` → one packed row of ``partition`` rows per bucket.

        Raises:
            spark_jobs.kafka_source.KafkaDataLossError: as the ``arbkafka`` reader.
        """
        if isinstance(partition, PartitionList):
            yield packed(partition_list(partition.keys, self.decode))
            return
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
