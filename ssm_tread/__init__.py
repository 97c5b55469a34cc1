"""ssm_tread: TREAD token routing for state-space and transformer diffusion backbones."""

__version__ = "0.1.0"
