import time, numpy as np, pyarrow as pa, pyarrow.parquet as pq, tempfile, os
W = 65*768; B = 32
rng = np.random.default_rng(0)
vals = [rng.standard_normal((B, W)).astype(np.float16) for _ in range(16)]
ids = [f"img{i}" for i in range(B)]
def run(kind, comp):
    with tempfile.TemporaryDirectory() as d:
        p = os.path.join(d, "x.parquet")
        if kind == "fsl":
            schema = pa.schema([("image_id", pa.string()), ("embedding", pa.list_(pa.float16(), W))])
        else:
            schema = pa.schema([("image_id", pa.string()), ("embedding", pa.binary(W * 2))])
        a = time.perf_counter()
        w = pq.ParquetWriter(p, schema, compression=comp, use_dictionary=["image_id"], write_statistics=["image_id"])
        for v in vals:
            if kind == "fsl":
                col = pa.FixedSizeListArray.from_arrays(pa.array(v.reshape(-1), type=pa.float16()), W)
            else:
                col = pa.FixedSizeBinaryArray.from_buffers(pa.binary(W * 2), B, [None, pa.py_buffer(v)])
            w.write_table(pa.table([pa.array(ids), col], schema=schema))
        w.close()
        wt = time.perf_counter() - a
        a = time.perf_counter()
        t = pq.read_table(p)
        col = t.column("embedding").combine_chunks()
        if kind == "fsl":
            arr = col.values.to_numpy(zero_copy_only=False)
        else:
            arr = np.frombuffer(col.buffers()[1], dtype=np.float16)
        rt = time.perf_counter() - a
        return wt / (16 * B) * 1e3, rt / (16*B) * 1e3, os.path.getsize(p) / 1e6
for rep in range(2):
    for kind in ["fsl", "bin"]:
        for comp in ["zstd", "none", "lz4"]:
            w, r, s = run(kind, comp)
            print(f"{kind} {comp}: write {w:.2f} ms/img read {r:.2f} ms/img size {s:.1f} MB")
