"""DiT-S/2 + TREAD: half of the tokens bypass blocks 2..8 (of 12)."""
from dit_s2 import *

routing["routes"] = [(2, 8, 0.5)]
