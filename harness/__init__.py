"""memhp: a real-kernel test harness for Linux memory hotplug (memmap_on_memory).

Data flow: kernel -> guest image -> VM -> hotplug op -> observation -> check -> report.
"""
__version__ = "0.1.0"
