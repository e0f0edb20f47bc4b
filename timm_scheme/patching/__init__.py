"""The patch: finding timm's MLPs (``timm_mlps``), the adapters of other MLP classes (``adapters``, with timm's own
families in ``timm_adapters``), host-following init (``host_init``) and ``scheme_patch`` itself (``patch``)."""
