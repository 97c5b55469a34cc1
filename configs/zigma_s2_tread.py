"""ZigMa-S/2 + TREAD: half of the tokens bypass blocks 2..20 (of 24), read in each block's zigzag order."""
from zigma_s2 import *

routing["routes"] = [(2, 20, 0.5)]
