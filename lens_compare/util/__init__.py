"""Small helpers every layer uses: files, the cache, progress bars, versions, atomic writes, the
closed sets of names, the CLI convention.
"""
