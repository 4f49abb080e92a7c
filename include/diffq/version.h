#pragma once
/// \file diffq/version.h
/// The library's version: the one home of the number that CMake's `project()` reads and that
/// every checkpoint records (`library_version`, `docs/checkpoint_format.md`).

#define DIFFQ_VERSION_MAJOR 0
#define DIFFQ_VERSION_MINOR 2
#define DIFFQ_VERSION_PATCH 0
#define DIFFQ_VERSION_STRING "0.2.0"
