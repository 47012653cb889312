import sys

from bench.pi_arm64.check import main

sys.exit(main())
