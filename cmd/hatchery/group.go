package main

import (
	"fmt"
	"net/url"
	"strconv"

	"github.com/spf13/cobra"

	"github.com/hatchery/hatchery/internal/dps"
)

func groupCmd() *cobra.Command {
	cmd := &cobra.Command{Use: "enrollment-group", Short: "Manage enrollment groups (as `az iot dps enrollment-group`)"}
	var groupID string
	idFlag := func(c *cobra.Command) {
		c.Flags().StringVar(&groupID, "group-id", "", "the enrollment group's ID")
		_ = c.MarkFlagRequired("group-id")
	}
	group := resource{svc: dpsClient, path: func() string { return "/enrollmentGroups/" + url.PathEscape(groupID) }, flags: idFlag}
	put := func(use, short string, update bool) *cobra.Command {
		var f enrollmentFlags
		c := &cobra.Command{Use: use, Short: short, RunE: func(cmd *cobra.Command, _ []string) error {
			out, err := putEnrollment(cmd, group.path(), update, &dps.EnrollmentGroup{EnrollmentGroupID: groupID},
				func(g *dps.EnrollmentGroup) string { return g.ETag },
				func(g *dps.EnrollmentGroup) error {
					if !update && !cmd.Flags().Changed("attestation-type") {
						g.Attestation = dps.Attestation{Type: dps.AttestationSymmetricKey, SymmetricKey: &dps.SymmetricKeyAttestation{}}
					}
					var noDeviceID string // groups have none
					return f.apply(cmd, groupShared(g), &noDeviceID)
				})
			if err != nil {
				return err
			}
			return showGroup(cmd, out)
		}}
		idFlag(c)
		f.register(c, false, update)
		return c
	}
	show := showWithKeys(group, "Show an enrollment group", func(g *dps.EnrollmentGroup) *dps.Attestation { return &g.Attestation }, showGroup)
	del := group.deleteCmd("Delete an enrollment group")
	listCmd := &cobra.Command{Use: "list", Short: "List enrollment groups", RunE: func(cmd *cobra.Command, _ []string) error {
		all, err := queryAll[dps.EnrollmentGroup](cmd, dpsClient, "/enrollmentGroups/query", "*")
		if err != nil {
			return err
		}
		rows := make([][]string, 0, len(all))
		for _, g := range all {
			rows = append(rows, []string{g.EnrollmentGroupID, g.Attestation.Type, strconv.FormatBool(g.Capabilities != nil && g.Capabilities.IoTEdge), g.ProvisioningStatus})
		}
		return renderTable(cmd, all, []string{"GROUP ID", "ATTESTATION", "EDGE", "STATUS"}, rows)
	}}
	cmd.AddCommand(put("create", "Create an enrollment group: symmetric key (the default), X.509 CAs, or TPM makers' CAs", false), put("update", "Change an enrollment group", true), show, del, listCmd,
		rotateCmd(idFlag, func(cmd *cobra.Command, which string) error {
			out, err := putEnrollment(cmd, group.path(), true, &dps.EnrollmentGroup{},
				func(g *dps.EnrollmentGroup) string { return g.ETag },
				func(g *dps.EnrollmentGroup) error { return regenerate(&g.Attestation, which) })
			if err != nil {
				return err
			}
			return showGroup(cmd, out)
		}))
	return cmd
}

func showGroup(cmd *cobra.Command, g *dps.EnrollmentGroup) error {
	rows := append([][2]string{{"Group ID", g.EnrollmentGroupID}, {"Attestation", g.Attestation.Type}}, credentialRows(g.Attestation)...)
	return render(cmd, g, append(rows, settingRows(groupShared(g))...))
}

func registrationCmd() *cobra.Command {
	cmd := &cobra.Command{Use: "registration", Short: "Show device registration records"}
	var regID, groupID string
	registration := resource{svc: dpsClient, path: func() string { return "/registrations/" + url.PathEscape(regID) },
		flags: func(c *cobra.Command) {
			c.Flags().StringVar(&regID, "registration-id", "", "the device's registration ID")
			_ = c.MarkFlagRequired("registration-id")
		}}
	show := showCmd(registration, "Show a device's registration", func(cmd *cobra.Command, r *dps.RegistrationState) error {
		return render(cmd, r, [][2]string{
			{"Registration ID", r.RegistrationID}, {"Status", r.Status}, {"Substatus", orDash(r.Substatus)},
			{"Device ID", orDash(r.DeviceID)}, {"Assigned hub", orDash(r.AssignedHub)},
			{"Last updated", fmt.Sprint(r.LastUpdatedDateTimeUtc)}, {"Error", orDash(r.ErrorMessage)},
		})
	})
	del := registration.deleteCmd("Delete a device's registration record")
	listCmd := &cobra.Command{Use: "list", Short: "List registrations (of one group with --group-id)", RunE: func(cmd *cobra.Command, _ []string) error {
		gid := groupID
		if gid == "" {
			gid = "*"
		}
		all, err := queryAll[dps.RegistrationState](cmd, dpsClient, "/registrations/"+url.PathEscape(gid)+"/query", "*")
		if err != nil {
			return err
		}
		rows := make([][]string, 0, len(all))
		for _, r := range all {
			rows = append(rows, []string{r.RegistrationID, r.Status, orDash(r.DeviceID), orDash(r.AssignedHub)})
		}
		return renderTable(cmd, all, []string{"REGISTRATION ID", "STATUS", "DEVICE ID", "ASSIGNED HUB"}, rows)
	}}
	listCmd.Flags().StringVar(&groupID, "group-id", "", "only this enrollment group's devices")
	cmd.AddCommand(show, del, listCmd)
	return cmd
}
