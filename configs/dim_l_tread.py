"""DiM-L/2 + TREAD: half of the grid tokens bypass blocks 2..45 (of 49), read in each block's scan order."""
from dim_l import *

routing["routes"] = [(2, 45, 0.5)]
