"""DiM-S/2 (ours) + TREAD: half of the grid tokens bypass blocks 2..21 (of 25), read in each block's scan order."""
from dim_s2 import *

routing["routes"] = [(2, 21, 0.5)]
