"""A small Django project for the tests: an included, namespaced API, path converters, a re_path, a cached
function view, a cached class-based view and an uncached one."""
