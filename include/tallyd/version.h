/*
 * version.h — tallyd's release version (semantic versioning), printed by
 * `tallyd --version`.
 */
#ifndef TALLYD_VERSION_H
#define TALLYD_VERSION_H

#define TALLYD_VERSION "0.1.0"

#endif
