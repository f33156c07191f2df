"""adapterhub benchmarks: each compares against PEFT in the same run and prints a ratio last.

    python -m bench            # every benchmark, then a markdown table (bench/results.md)
    python -m bench plan       # one benchmark
"""
