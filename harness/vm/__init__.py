"""Stage 2: guest image + frozen GuestConfig -> a booted QEMU guest (argv, Machine, console, QMP, SSH, Guest)."""
