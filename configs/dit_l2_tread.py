"""DiT-L/2 + TREAD: half of the tokens bypass blocks 2..20 (of 24)."""
from dit_l2 import *

routing["routes"] = [(2, 20, 0.5)]
