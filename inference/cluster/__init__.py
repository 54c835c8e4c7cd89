"""Ray plumbing for replica groups past one machine: joining or starting Ray (``connect``), gangs of actors
that form one group's torch.distributed world (``gang``), and files as object-store bundles (``transfer``)."""
