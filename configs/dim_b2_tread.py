"""DiM-B/2 (ours) + TREAD: half of the grid tokens bypass blocks 2..21 (of 25), read in each block's scan order."""
from dim_b2 import *

routing["routes"] = [(2, 21, 0.5)]
