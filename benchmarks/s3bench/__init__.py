"""The parts of ``benchmarks/bench_s3.py`` (the script is the entry point; run that).

link: the server's CPU, the S3 request counter and the rate-limited TCP proxy;
workload: the GPT + AdamW state; context: what every part shares (server, bucket, work
directory, timing); updown, codecs, loop: parts 1, 2 and 3; report: ratios and tables.
"""

MB = 1e6
MIB = 1 << 20
