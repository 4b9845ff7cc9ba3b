"""Read a mitm-sse capture folder with Spark (local mode), as a team would on shared storage.

Run with the client venv's Python (pyspark, Java): python spark_read.py CAPTURE_DIR
Prints a JSON summary: row counts, partition days, and the latest revision of every stream.
"""

from __future__ import annotations

import json
import sys

from pyspark.sql import SparkSession, Window
from pyspark.sql import functions as F


def main() -> None:
    root = sys.argv[1]
    spark = (
        SparkSession.builder.master("local[1]")
        .appName("mitm-sse-reader")
        .config("spark.ui.enabled", "false")
        .config("spark.driver.host", "127.0.0.1")
        .config("spark.driver.bindAddress", "127.0.0.1")
        .config("spark.sql.shuffle.partitions", "1")
        .getOrCreate()
    )
    spark.sparkContext.setLogLevel("ERROR")
    try:

        def table(name: str):
            # Partition discovery finds day=YYYY-MM-DD; files starting with "." (.superseded.parquet) are
            # skipped by Spark itself; the glob filter skips segments still being written (*.parquet.tmp).
            return (
                spark.read.option("pathGlobFilter", "*.parquet")
                .option("mergeSchema", "true")
                .parquet(f"{root}/{name}")
            )

        revisions = table("streams")
        latest = (
            revisions.withColumn(
                "_n",
                F.row_number().over(
                    Window.partitionBy("stream_id").orderBy(F.col("rev").desc(), F.col("t_updated_ns").desc())
                ),
            )
            .filter("_n = 1")
            .drop("_n")
        )
        chunks, events = table("chunks"), table("events")
        per_stream = (
            latest.join(chunks.groupBy("stream_id").agg(F.sum("size").alias("bytes")), "stream_id", "left")
            .select("stream_id", "rev", "end_reason", "n_events", "bytes")
            .orderBy("stream_id")
            .collect()
        )
        out = {
            "spark": spark.version,
            "streams_revisions": revisions.count(),
            "streams": latest.count(),
            "chunks": chunks.count(),
            "events": events.count(),
            "days": sorted({str(r.day) for r in revisions.select("day").distinct().collect()}),
            "day_type": dict(revisions.dtypes)["day"],
            "latest": [r.asDict() for r in per_stream],
        }
        json.dump(out, sys.stdout)
    finally:
        spark.stop()


if __name__ == "__main__":
    main()
