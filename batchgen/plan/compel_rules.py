# TEMPORARY STUB
def check_compel(base, clip_skip, where): return None
