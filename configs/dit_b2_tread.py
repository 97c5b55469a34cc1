"""DiT-B/2 + TREAD: half of the tokens bypass blocks 2..8 (of 12)."""
from dit_b2 import *

routing["routes"] = [(2, 8, 0.5)]
