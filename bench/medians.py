"""Median, min and max per name of `NAME SECONDS` lines: python3 bench/medians.py TIMES.txt"""
import statistics
import sys

times: dict[str, list[float]] = {}
with open(sys.argv[1]) as lines:
    for line in lines:
        name, seconds = line.split()
        times.setdefault(name, []).append(float(seconds))
for name, ts in times.items():
    print(f"{name:<24} median {statistics.median(ts):.3f} s  min {min(ts):.3f}  max {max(ts):.3f}  (n={len(ts)})")
