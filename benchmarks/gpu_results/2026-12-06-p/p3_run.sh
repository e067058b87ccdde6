OUT=$OUT timeout 120 python3 benchmarks/gpu_offline.py --shape smollm2 --n 4000 --variants async  # run p3, twice, on the warm H200 after p2
