"""Run the USP benchmark (SPEC §9): `python bench/run_bench.py [--quick] [--out bench/results]`."""

from usp_core.bench import main

if __name__ == "__main__":
    main()
